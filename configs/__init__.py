"""Shipped configs, installed as ``zoft.configs``: model alias configs (``models/``) and recipes."""
