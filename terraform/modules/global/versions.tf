terraform {
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
      # aws: the directory's primary region (the global cluster is created there).
      # aws.us_east_1: Route 53's DNSSEC signing key and query logs must live in us-east-1.
      configuration_aliases = [aws.us_east_1]
    }
  }
}
