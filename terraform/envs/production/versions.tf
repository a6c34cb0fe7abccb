terraform {
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # The deployment pins the exact provider; .terraform.lock.hcl pins its checksum.
      version = "5.100.0"
    }
  }

  # Partial configuration: the bucket, key, region, KMS key and lock settings come from
  # backend.hcl (see backend.hcl.example and ../../README.md). `terraform init -backend=false`
  # needs none of it, which is how the offline checks run.
  backend "s3" {}
}
