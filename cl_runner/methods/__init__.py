"""Continual-learning methods. Each is one module here plus one YAML in conf/method/.

The YAML's ``_target_`` names the class, so adding a method edits nothing else.
"""
