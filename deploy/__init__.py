"""The AWS side of the project: package, push, deploy, invoke, train and run pipelines.

Plain boto3 rather than the SageMaker Python SDK: every request is written out here
(easy to review, to diff against the API reference and to test under moto), and the
SDK's heavy dependency tree stays out of the image and the CI. See deploy/README.md.

    python -m deploy --help
"""
