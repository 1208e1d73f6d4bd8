"""The serverless side: what the two Lambdas run. The initiator (torch-free, zip-packaged)
starts rounds; the averager (torch, Docker image) accepts updates, aggregates and watches."""
