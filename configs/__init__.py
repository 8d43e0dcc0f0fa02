"""The shipped YAML configs (experiments/, model/, recipe/, launch/) as package data, found
through importlib.resources by pretrain.config.CONFIG_ROOT; no Python code lives here."""
