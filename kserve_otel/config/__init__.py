"""Configuration, read by the set-up on top (:mod:`kserve_otel.telemetry`, the instrumentors, the command
line).

``settings`` is the one table of settings with their precedence (argument > variable > pod annotation >
default); ``annotations`` reads the pod's annotations file; ``problems`` reports a bad value once per process
tree. Importing this package must stay cheap: the start-up hook does it in every Python process.
"""
