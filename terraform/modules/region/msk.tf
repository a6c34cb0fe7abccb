################################################################################
# MSK: the region's Kafka (events topic, DLQ). Private, TLS between clients and brokers and
# between brokers, storage encrypted with the msk key, no unauthenticated or plaintext listener.
# Two authenticated listeners: SASL/SCRAM-SHA-512 on 9096 for the platform (its librdkafka
# client: FIRSTMILE_KAFKA_SECURITY_PROTOCOL=SASL_SSL, FIRSTMILE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512)
# and SASL/IAM on 9098 for operators' tools.
################################################################################

resource "aws_security_group" "msk" {
  name        = "${local.name}-msk"
  description = "MSK of ${local.name}: SASL/SCRAM and SASL/IAM over TLS from the EKS cluster only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-msk" })
}

resource "aws_vpc_security_group_ingress_rule" "msk_from_eks" {
  security_group_id            = aws_security_group.msk.id
  description                  = "Kafka SASL/IAM over TLS from the EKS nodes and pods"
  ip_protocol                  = "tcp"
  from_port                    = 9098
  to_port                      = 9098
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "msk_scram_from_eks" {
  security_group_id            = aws_security_group.msk.id
  description                  = "Kafka SASL/SCRAM over TLS from the EKS nodes and pods"
  ip_protocol                  = "tcp"
  from_port                    = 9096
  to_port                      = 9096
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "msk_exporters_from_eks" {
  security_group_id            = aws_security_group.msk.id
  description                  = "Prometheus JMX and node exporters of the brokers, scraped from the cluster"
  ip_protocol                  = "tcp"
  from_port                    = 11001
  to_port                      = 11002
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

resource "aws_msk_configuration" "this" {
  name           = "${local.name}-${replace(var.msk.kafka_version, ".", "-")}"
  kafka_versions = [var.msk.kafka_version]
  description    = "${local.name}: topics are created by the platform (relay, consumers, tenants apply), replicated to every zone"

  # Three zones: a write is acknowledged by two of them, so one zone can be lost.
  server_properties = <<-EOT
    auto.create.topics.enable=false
    default.replication.factor=3
    min.insync.replicas=2
    unclean.leader.election.enable=false
  EOT

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_msk_cluster" "this" {
  cluster_name           = local.name
  kafka_version          = var.msk.kafka_version
  number_of_broker_nodes = var.msk.brokers_per_zone * length(local.azs)
  enhanced_monitoring    = "PER_TOPIC_PER_BROKER"

  broker_node_group_info {
    instance_type   = var.msk.broker_instance_type
    client_subnets  = [for s in aws_subnet.database : s.id]
    security_groups = [aws_security_group.msk.id]

    storage_info {
      ebs_storage_info {
        volume_size = var.msk.broker_volume_size_gb
      }
    }

    connectivity_info {
      public_access {
        type = "DISABLED"
      }
    }
  }

  client_authentication {
    unauthenticated = false
    sasl {
      scram = true
      iam   = true
    }
  }

  encryption_info {
    encryption_at_rest_kms_key_arn = aws_kms_key.this["msk"].arn
    encryption_in_transit {
      client_broker = "TLS"
      in_cluster    = true
    }
  }

  configuration_info {
    arn      = aws_msk_configuration.this.arn
    revision = aws_msk_configuration.this.latest_revision
  }

  # The chart's Prometheus scrapes the brokers' JMX and node exporters (11001, 11002).
  open_monitoring {
    prometheus {
      jmx_exporter {
        enabled_in_broker = true
      }
      node_exporter {
        enabled_in_broker = true
      }
    }
  }

  logging_info {
    broker_logs {
      cloudwatch_logs {
        enabled   = true
        log_group = aws_cloudwatch_log_group.this["msk"].name
      }
    }
  }

  tags = local.tags
}

################################################################################
# The platform's SASL/SCRAM user. MSK reads SCRAM credentials only from Secrets Manager secrets
# whose name starts with AmazonMSK_ and that are encrypted with a customer-managed key (never the
# default aws/secretsmanager key); the secret holds {"username": ..., "password": ...}. Its key is
# the msk_scram key rather than the secrets key, so that whatever MSK is allowed to do with it
# opens no other secret of the region.
#
# The password is generated once per msk.scram_password_version and written write-only to the
# secret; nothing else in this module reads it. Rotating it (raise the version) changes the
# user's password once MSK has synced the secret: the relay and consumers need the new one in
# FIRSTMILE_KAFKA_SASL_PASSWORD and a restart. As for the directory's password, the generator is
# a data source, so the state holds a password until the next apply (README, "State and secrets").
################################################################################

locals {
  msk_scram_username = "firstmile"
}

data "aws_secretsmanager_random_password" "msk_scram" {
  password_length     = 64
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "msk_scram" {
  #checkov:skip=CKV2_AWS_57:Rotated by raising msk.scram_password_version (a new password written to the secret, which MSK syncs); clients must be given it and restarted, which a rotation Lambda cannot do.
  name                    = "AmazonMSK_${local.name}_${local.msk_scram_username}"
  description             = "SASL/SCRAM user ${local.msk_scram_username} of the ${local.name} MSK cluster (FIRSTMILE_KAFKA_SASL_USERNAME, FIRSTMILE_KAFKA_SASL_PASSWORD)"
  kms_key_id              = aws_kms_key.this["msk_scram"].arn
  recovery_window_in_days = 30
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "msk_scram" {
  secret_id = aws_secretsmanager_secret.msk_scram.id
  secret_string_wo = jsonencode({
    username = local.msk_scram_username
    password = data.aws_secretsmanager_random_password.msk_scram.random_password
  })
  secret_string_wo_version = var.msk.scram_password_version
}

# MSK attaches this very policy when the secret is associated; declaring it keeps the plan clean
# (no drift) and makes the grant explicit: the Kafka service may read this secret, no one else
# gains anything.
resource "aws_secretsmanager_secret_policy" "msk_scram" {
  secret_arn          = aws_secretsmanager_secret.msk_scram.arn
  block_public_policy = true
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "AWSKafkaResourcePolicy"
      Effect    = "Allow"
      Principal = { Service = "kafka.${local.dns_suffix}" }
      Action    = "secretsmanager:getSecretValue"
      Resource  = aws_secretsmanager_secret.msk_scram.arn
    }]
  })
}

# Exclusive: the cluster's SCRAM users are exactly these secrets.
resource "aws_msk_scram_secret_association" "this" {
  cluster_arn     = aws_msk_cluster.this.arn
  secret_arn_list = [aws_secretsmanager_secret.msk_scram.arn]

  depends_on = [aws_secretsmanager_secret_version.msk_scram, aws_secretsmanager_secret_policy.msk_scram]
}
