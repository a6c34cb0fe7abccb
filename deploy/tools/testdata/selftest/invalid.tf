# terraform validate must reject this: aws_s3_bucket has no argument `bucket_name` (it is `bucket`).
# Validating it also proves the provider installs from the filesystem mirror.
terraform {
  required_providers {
    aws = { source = "hashicorp/aws" }
  }
}

resource "aws_s3_bucket" "selftest" {
  bucket_name = "selftest"
}
