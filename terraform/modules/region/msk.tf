################################################################################
# MSK: the region's Kafka (events topic, DLQ). Private, TLS between clients and brokers and
# between brokers, storage encrypted with the msk key, IAM authentication only (SASL/IAM on
# 9098), no unauthenticated or plaintext listener.
################################################################################

resource "aws_security_group" "msk" {
  name        = "${local.name}-msk"
  description = "MSK of ${local.name}: SASL/IAM over TLS from the EKS cluster only"
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
      iam = true
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
