# Plans the whole production environment (terraform.tfvars: eu-west-1 primary, us-east-1)
# against mocked AWS providers, one per alias, and checks how the regions compose: the data
# decides which region blocks exist, which one holds the directory's writer, and the names
# each region answers. The region and global modules' own tests check the resources.

mock_provider "aws" {
  override_during = plan
  source          = "../../tests/mocks/aws"
}

mock_provider "aws" {
  alias           = "us_east_1"
  override_during = plan
  source          = "../../tests/mocks/aws"
}

mock_provider "aws" {
  alias           = "us_west_2"
  override_during = plan
  source          = "../../tests/mocks/aws"
}

mock_provider "aws" {
  alias           = "eu_west_1"
  override_during = plan
  source          = "../../tests/mocks/aws"
}

mock_provider "aws" {
  alias           = "eu_central_1"
  override_during = plan
  source          = "../../tests/mocks/aws"
}

# Each region's module asks its provider which region it is in.
override_data {
  override_during = plan
  target          = module.region_us_east_1["us-east-1"].module.region.data.aws_region.current
  values          = { name = "us-east-1" }
}

override_data {
  override_during = plan
  target          = module.region_eu_central_1["eu-central-1"].module.region.data.aws_region.current
  values          = { name = "eu-central-1" }
}

# Each region's models file system and Kafka SCRAM secret their own IDs, so that the outputs
# cannot mix them up (with each other or with another secret) unseen.
override_resource {
  override_during = plan
  target          = module.region_eu_west_1["eu-west-1"].module.region.aws_efs_file_system.models
  values          = { id = "fs-eu-west-1" }
}

override_resource {
  override_during = plan
  target          = module.region_us_east_1["us-east-1"].module.region.aws_efs_file_system.models
  values          = { id = "fs-us-east-1" }
}

override_resource {
  override_during = plan
  target          = module.region_eu_west_1["eu-west-1"].module.region.aws_secretsmanager_secret.msk_scram
  values          = { arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:AmazonMSK_firstmile-production_firstmile-eu" }
}

override_resource {
  override_during = plan
  target          = module.region_us_east_1["us-east-1"].module.region.aws_secretsmanager_secret.msk_scram
  values          = { arn = "arn:aws:secretsmanager:us-east-1:111122223333:secret:AmazonMSK_firstmile-production_firstmile-us" }
}

run "production_data" {
  command = plan

  assert {
    condition = (
      length(module.region_eu_west_1) == 1 && length(module.region_us_east_1) == 1 &&
      length(module.region_us_west_2) == 0 && length(module.region_eu_central_1) == 0
    )
    error_message = "Exactly the regions of terraform.tfvars must be deployed."
  }

  assert {
    condition = (
      module.region_eu_west_1["eu-west-1"].directory_primary_cluster_arn != null &&
      module.region_us_east_1["us-east-1"].directory_primary_cluster_arn == null
    )
    error_message = "The primary region (eu-west-1) must hold the directory's writer, and only it."
  }

  assert {
    condition = (
      module.region_eu_west_1["eu-west-1"].region.api_urls.region == "https://eu-west-1.api.firstmile.example.com" &&
      module.region_us_east_1["us-east-1"].region.api_urls.region == "https://us-east-1.api.firstmile.example.com" &&
      module.region_us_east_1["us-east-1"].region.api_urls.shared == "https://api.firstmile.example.com"
    )
    error_message = "Each region must answer its own name and the shared, latency-routed one."
  }

  assert {
    condition     = output.directory_global_cluster_identifier == "firstmile-production-directory"
    error_message = "The directory's global cluster must be the environment's."
  }

  assert {
    condition     = keys(output.regions) == ["eu-west-1", "us-east-1"]
    error_message = "The outputs must describe every deployed region."
  }

  assert {
    condition = alltrue([
      for region, o in output.regions :
      o.msk_scram_secret_arn == "arn:aws:secretsmanager:${region}:111122223333:secret:AmazonMSK_firstmile-production_firstmile-${substr(region, 0, 2)}" &&
      o.msk_bootstrap_brokers_sasl_scram == local.region_modules[region].region.msk_bootstrap_brokers_sasl_scram &&
      o.efs_file_system_id == "fs-${region}"
    ])
    error_message = "Each region's outputs must carry its Kafka SCRAM brokers and secret and its models file system (the chart's Kafka settings and models StorageClass)."
  }
}

run "a_new_region_is_one_map_entry" {
  command = plan

  variables {
    regions = {
      "eu-west-1"    = { vpc_cidr = "10.20.0.0/16" }
      "us-east-1"    = { vpc_cidr = "10.30.0.0/16" }
      "eu-central-1" = { vpc_cidr = "10.40.0.0/16", aurora = { instance_count = 3 } }
    }
  }

  assert {
    condition = (
      length(module.region_eu_central_1) == 1 &&
      module.region_eu_central_1["eu-central-1"].directory_primary_cluster_arn == null &&
      module.region_eu_central_1["eu-central-1"].region.api_urls.region == "https://eu-central-1.api.firstmile.example.com"
    )
    error_message = "A third map entry must deploy a third region, as a directory secondary."
  }
}

################################################################################
# Bad input: each run must fail on exactly the variable named (its message: tests/bad_input.py).
################################################################################

run "rejects_an_unknown_region_key" {
  command = plan
  variables {
    regions = {
      "eu-west-1"    = { vpc_cidr = "10.20.0.0/16" }
      "mars-north-1" = { vpc_cidr = "10.30.0.0/16" }
    }
  }
  # fails with: not a region this environment has a provider for
  expect_failures = [var.regions]
}

run "rejects_a_vpc_cidr_that_is_not_a_cidr" {
  command = plan
  variables {
    regions = { "eu-west-1" = { vpc_cidr = "10.300.0.0/16" } }
  }
  # fails with: Every region needs vpc_cidr
  expect_failures = [var.regions]
}

run "rejects_overlapping_region_cidrs" {
  command = plan
  variables {
    regions = {
      "eu-west-1" = { vpc_cidr = "10.20.0.0/16" }
      "us-east-1" = { vpc_cidr = "10.20.128.0/17" }
    }
  }
  # fails with: overlapping vpc_cidr blocks
  expect_failures = [var.regions]
}

run "rejects_a_misspelt_setting" {
  command = plan
  variables {
    regions = { "eu-west-1" = { vpc_cidr = "10.20.0.0/16", aurorra = { instance_count = 3 } } }
  }
  # fails with: an entry with an unknown key
  expect_failures = [var.regions]
}

run "rejects_a_primary_region_that_is_not_deployed" {
  command = plan
  variables {
    primary_region = "us-west-2"
  }
  expect_failures = [var.primary_region]
}
