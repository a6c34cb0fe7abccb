"""Machine learning on the platform side: the online feature store and the inference client."""
