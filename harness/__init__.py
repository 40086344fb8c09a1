"""CKNNA alignment harness for vision-language-action model features."""
__version__ = "0.1.0"
