"""Packing and serving: model-config.yaml, config.properties, log4j2.xml, metrics.yaml,
build.py (the .mar) and server.py (start, wait until READY, stop)."""
