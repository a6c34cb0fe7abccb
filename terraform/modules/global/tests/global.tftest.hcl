# Plans the global module against mocked AWS providers (the directory's primary region and
# us-east-1) and checks the tenant directory's global database and the public zone.

mock_provider "aws" {
  override_during = plan
  source          = "../../tests/mocks/aws"
}

mock_provider "aws" {
  alias           = "us_east_1"
  override_during = plan
  source          = "../../tests/mocks/aws"
}

variables {
  environment = "production"
  domain_name = "firstmile.example.com"
}

run "directory_and_zone" {
  command = plan

  assert {
    condition = (
      aws_rds_global_cluster.directory.global_cluster_identifier == "firstmile-production-directory" &&
      aws_rds_global_cluster.directory.engine == "aurora-postgresql" &&
      aws_rds_global_cluster.directory.database_name == "firstmile_directory" &&
      aws_rds_global_cluster.directory.storage_encrypted &&
      aws_rds_global_cluster.directory.deletion_protection &&
      aws_rds_global_cluster.directory.force_destroy == false
    )
    error_message = "The tenant directory's global database must be PostgreSQL, encrypted and protected from deletion."
  }

  assert {
    condition     = aws_route53_zone.this.name == "firstmile.example.com" && length(aws_route53_zone.this.vpc) == 0
    error_message = "The zone must be the environment's public zone."
  }

  assert {
    condition = (
      aws_route53_hosted_zone_dnssec.this[0].signing_status == "SIGNING" &&
      aws_kms_key.dnssec[0].customer_master_key_spec == "ECC_NIST_P256" &&
      aws_kms_key.dnssec[0].key_usage == "SIGN_VERIFY"
    )
    error_message = "The zone must be signed with DNSSEC by an ECC P-256 key."
  }

  assert {
    condition = (
      aws_cloudwatch_log_group.query_logs.kms_key_id == aws_kms_key.query_logs.arn &&
      aws_kms_key.query_logs.enable_key_rotation &&
      aws_route53_query_log.this.cloudwatch_log_group_arn == aws_cloudwatch_log_group.query_logs.arn
    )
    error_message = "Query logs must go to a log group encrypted with a rotating key."
  }
}

run "dnssec_can_be_left_off" {
  command = plan

  variables {
    enable_dnssec = false
  }

  assert {
    condition     = length(aws_kms_key.dnssec) == 0 && length(aws_route53_hosted_zone_dnssec.this) == 0 && output.dnssec_ds_record == null
    error_message = "Without DNSSEC no signing key is made."
  }
}

run "rejects_a_domain_with_upper_case" {
  command = plan
  variables {
    domain_name = "FirstMile.example.com"
  }
  expect_failures = [var.domain_name]
}

run "rejects_an_engine_version_that_is_not_one" {
  command = plan
  variables {
    directory = { engine_version = "latest" }
  }
  # fails with: directory.engine_version
  expect_failures = [var.directory]
}
