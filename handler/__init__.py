"""The TorchServe side of the service: ncf_handler.py (the handler) and schema.py (requests).

Inside the .mar the handler runs from the extracted archive, which holds this package, the
`model` package and the artifact (archive/build.py lays it out).
"""

# Folder of the .mar that holds the artifact's files; written by archive/build.py.
ARTIFACT_DIR = "artifact"
