################################################################################
# Providers. Terraform cannot create provider configurations from for_each (a provider is
# static configuration, resolved before any expression is evaluated), so a map of regions cannot
# by itself produce one provider per region. This root therefore declares one aliased provider
# for each AWS region it can deploy to, and regions.tf has one module block per alias that
# for_each-es over the map's entry for that region (zero or one). Adding one of these regions
# is a map entry in terraform.tfvars; adding an AWS region not listed here also needs its
# provider below and its block in regions.tf (README.md, "Adding a region").
################################################################################

locals {
  # Keep in step with the aliases below and the blocks in regions.tf (and their line in main.tf).
  supported_regions = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1"]

  default_tags = merge(var.tags, {
    "firstmile:environment" = var.environment
    "firstmile:managed-by"  = "terraform/envs/${var.environment}"
  })
}

# The directory's primary region: the global module's global cluster is created there.
provider "aws" {
  region              = var.primary_region
  allowed_account_ids = var.allowed_account_ids
  default_tags { tags = local.default_tags }
}

provider "aws" {
  alias               = "us_east_1"
  region              = "us-east-1"
  allowed_account_ids = var.allowed_account_ids
  default_tags { tags = local.default_tags }
}

provider "aws" {
  alias               = "us_west_2"
  region              = "us-west-2"
  allowed_account_ids = var.allowed_account_ids
  default_tags { tags = local.default_tags }
}

provider "aws" {
  alias               = "eu_west_1"
  region              = "eu-west-1"
  allowed_account_ids = var.allowed_account_ids
  default_tags { tags = local.default_tags }
}

provider "aws" {
  alias               = "eu_central_1"
  region              = "eu-central-1"
  allowed_account_ids = var.allowed_account_ids
  default_tags { tags = local.default_tags }
}
