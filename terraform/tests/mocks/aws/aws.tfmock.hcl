# Values the mocked AWS provider returns where a test needs a realistic shape rather than the
# random strings Terraform generates: data sources the modules read, computed attributes they
# index into (the EKS OIDC issuer, the RDS-managed secret, the MSK ARN, ACM's validation
# records), and IDs that an assertion compares at plan time, where a mocked resource's id is
# otherwise still unknown (the EFS file system). Shared by every module's and environment's
# tests; per-region values are overridden by address in the environment's tests.

mock_data "aws_region" {
  defaults = {
    name = "eu-west-1"
  }
}

mock_data "aws_partition" {
  defaults = {
    partition  = "aws"
    dns_suffix = "amazonaws.com"
  }
}

mock_data "aws_caller_identity" {
  defaults = {
    account_id = "111122223333"
  }
}

mock_data "aws_availability_zones" {
  defaults = {
    names = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
  }
}

mock_data "aws_elb_service_account" {
  defaults = {
    arn = "arn:aws:iam::999999999999:root"
  }
}

mock_data "aws_secretsmanager_random_password" {
  defaults = {
    random_password = "mockgeneratedpassword0123456789abcdefghij"
  }
}

mock_data "aws_secretsmanager_secret_version" {
  defaults = {
    secret_string = "mockredisauthtoken0123456789abcdefghijklmnopqrstuvwxyz0123456789ab"
  }
}

mock_resource "aws_eks_cluster" {
  defaults = {
    identity              = [{ oidc = [{ issuer = "https://oidc.eks.eu-west-1.amazonaws.com/id/MOCK" }] }]
    certificate_authority = [{ data = "bW9jaw==" }]
  }
}

mock_resource "aws_rds_cluster" {
  defaults = {
    arn = "arn:aws:rds:eu-west-1:111122223333:cluster:firstmile-production-directory"
    master_user_secret = [{
      secret_arn    = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:rds!cluster-mock"
      kms_key_id    = "arn:aws:kms:eu-west-1:111122223333:key/mock"
      secret_status = "active"
    }]
  }
}

mock_resource "aws_msk_cluster" {
  defaults = {
    arn = "arn:aws:kafka:eu-west-1:111122223333:cluster/firstmile-production/mock-uuid"
  }
}

mock_resource "aws_efs_file_system" {
  defaults = {
    id  = "fs-mock"
    arn = "arn:aws:elasticfilesystem:eu-west-1:111122223333:file-system/fs-mock"
  }
}

mock_resource "aws_acm_certificate" {
  defaults = {
    arn = "arn:aws:acm:eu-west-1:111122223333:certificate/mock"
    domain_validation_options = [
      {
        domain_name           = "eu-west-1.api.firstmile.example.com"
        resource_record_name  = "_mock1.eu-west-1.api.firstmile.example.com."
        resource_record_type  = "CNAME"
        resource_record_value = "_mock1.acm-validations.aws."
      },
      {
        domain_name           = "api.firstmile.example.com"
        resource_record_name  = "_mock2.api.firstmile.example.com."
        resource_record_type  = "CNAME"
        resource_record_value = "_mock2.acm-validations.aws."
      },
    ]
  }
}


mock_resource "aws_lb" {
  defaults = {
    arn = "arn:aws:elasticloadbalancing:eu-west-1:111122223333:loadbalancer/app/mock/0123456789abcdef"
  }
}

mock_resource "aws_lb_target_group" {
  defaults = {
    arn = "arn:aws:elasticloadbalancing:eu-west-1:111122223333:targetgroup/mock/0123456789abcdef"
  }
}

mock_resource "aws_iam_role" {
  defaults = {
    arn = "arn:aws:iam::111122223333:role/mock"
  }
}

mock_resource "aws_iam_openid_connect_provider" {
  defaults = {
    arn = "arn:aws:iam::111122223333:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/MOCK"
  }
}

mock_resource "aws_cloudwatch_log_group" {
  defaults = {
    arn = "arn:aws:logs:eu-west-1:111122223333:log-group:mock"
  }
}

mock_resource "aws_s3_bucket" {
  defaults = {
    arn = "arn:aws:s3:::mock"
  }
}

mock_resource "aws_wafv2_web_acl" {
  defaults = {
    arn = "arn:aws:wafv2:eu-west-1:111122223333:regional/webacl/mock/0123"
  }
}

mock_resource "aws_msk_configuration" {
  defaults = {
    arn = "arn:aws:kafka:eu-west-1:111122223333:configuration/mock/0123"
  }
}

mock_resource "aws_secretsmanager_secret" {
  defaults = {
    arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:mock"
  }
}

mock_resource "aws_kms_key" {
  defaults = {
    arn = "arn:aws:kms:eu-west-1:111122223333:key/mock"
  }
}
