"""Serverless federated learning: the core shared by the Lambdas, the edge client and the CLI.

Importing this package imports nothing heavy: modules that need torch (codec, aggregation,
tasks) are imported explicitly by the parts that use them, so the initiator's Lambda stays
boto3-only.
"""

__version__ = "0.1.0"
