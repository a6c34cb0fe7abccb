################################################################################
# IAM roles for service accounts: one role per workload, trusted only by that workload's
# service account in the release's namespace, allowed only what the workload does.
#
#   api         Redis token; IAM login to both databases as the application roles
#   relay       Kafka: write the region's topics; IAM login as the relay role
#   consumers   Kafka: read the region's topics, write the DLQ, commit the region's groups;
#               Redis token; IAM login as the application role
#   scheduler   audit bucket: write and read checkpoints and archives; Redis token (stuck
#               scan); IAM login as the application role
#   migrations  the region database's master secret (firstmile migrate runs as the schema owner)
#   inference   nothing: the models come from the image's registry volume
#   lb_bindings the AWS Load Balancer Controller: register pods in the API target group only
################################################################################

locals {
  oidc_issuer = replace(aws_iam_openid_connect_provider.eks.url, "https://", "")

  irsa_subjects = merge(
    { for w, sa in var.service_accounts : w => "${var.kubernetes_namespace}/${sa}" if w != "lb_bindings" },
    { lb_bindings = "${var.lb_controller_namespace}/${var.service_accounts.lb_bindings}" },
  )

  irsa_trust = {
    for subject in concat(values(local.irsa_subjects), ["kube-system/aws-node"]) : subject => jsonencode({
      Version = "2012-10-17"
      Statement = [{
        Effect    = "Allow"
        Principal = { Federated = aws_iam_openid_connect_provider.eks.arn }
        Action    = "sts:AssumeRoleWithWebIdentity"
        Condition = {
          StringEquals = {
            "${local.oidc_issuer}:sub" = "system:serviceaccount:${replace(subject, "/", ":")}"
            "${local.oidc_issuer}:aud" = "sts.${local.dns_suffix}"
          }
        }
      }]
    })
  }

  # kafka-cluster resources are named cluster/<name>/<uuid>, topic/<name>/<uuid>/<topic>, ...
  msk_topic_arns = "${replace(aws_msk_cluster.this.arn, ":cluster/", ":topic/")}/${var.kafka_topic_prefix}.${local.region}.*"
  msk_group_arns = "${replace(aws_msk_cluster.this.arn, ":cluster/", ":group/")}/${var.kafka_topic_prefix}.${local.region}.*"

  rds_dbuser_arn = "arn:${local.partition}:rds-db:${local.region}:${local.account_id}:dbuser"
  directory_resource_id = one(concat(
    aws_rds_cluster.directory_primary[*].cluster_resource_id,
    aws_rds_cluster.directory_secondary[*].cluster_resource_id,
  ))

  statement = {
    kafka_connect = {
      Effect   = "Allow"
      Action   = ["kafka-cluster:Connect", "kafka-cluster:DescribeCluster"]
      Resource = aws_msk_cluster.this.arn
    }
    redis_token = {
      Effect   = "Allow"
      Action   = "secretsmanager:GetSecretValue"
      Resource = aws_secretsmanager_secret.redis_auth.arn
    }
    secrets_key = {
      Effect    = "Allow"
      Action    = "kms:Decrypt"
      Resource  = aws_kms_key.this["secrets"].arn
      Condition = { StringEquals = { "kms:ViaService" = "secretsmanager.${local.region}.${local.dns_suffix}" } }
    }
    db_as_app = {
      Effect   = "Allow"
      Action   = "rds-db:connect"
      Resource = "${local.rds_dbuser_arn}:${aws_rds_cluster.this.cluster_resource_id}/${var.database_users.app}"
    }
  }

  irsa_statements = {
    api = [
      local.statement.redis_token,
      local.statement.secrets_key,
      local.statement.db_as_app,
      {
        Effect   = "Allow"
        Action   = "rds-db:connect"
        Resource = "${local.rds_dbuser_arn}:${local.directory_resource_id}/${var.database_users.directory}"
      },
    ]
    relay = [
      local.statement.kafka_connect,
      {
        Effect   = "Allow"
        Action   = ["kafka-cluster:WriteDataIdempotently"]
        Resource = aws_msk_cluster.this.arn
      },
      {
        Effect   = "Allow"
        Action   = ["kafka-cluster:DescribeTopic", "kafka-cluster:CreateTopic", "kafka-cluster:WriteData"]
        Resource = local.msk_topic_arns
      },
      {
        Effect   = "Allow"
        Action   = "rds-db:connect"
        Resource = "${local.rds_dbuser_arn}:${aws_rds_cluster.this.cluster_resource_id}/${var.database_users.relay}"
      },
    ]
    consumers = [
      local.statement.kafka_connect,
      {
        Effect   = "Allow"
        Action   = ["kafka-cluster:DescribeTopic", "kafka-cluster:CreateTopic", "kafka-cluster:ReadData", "kafka-cluster:WriteData"]
        Resource = local.msk_topic_arns
      },
      {
        Effect   = "Allow"
        Action   = ["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"]
        Resource = local.msk_group_arns
      },
      local.statement.redis_token,
      local.statement.secrets_key,
      local.statement.db_as_app,
    ]
    scheduler = [
      {
        Effect   = "Allow"
        Action   = ["s3:PutObject", "s3:GetObject", "s3:GetObjectRetention"]
        Resource = ["${aws_s3_bucket.audit.arn}/checkpoints/*", "${aws_s3_bucket.audit.arn}/archives/*"]
      },
      {
        Effect    = "Allow"
        Action    = "s3:ListBucket"
        Resource  = aws_s3_bucket.audit.arn
        Condition = { StringLike = { "s3:prefix" = ["checkpoints/*", "archives/*"] } }
      },
      {
        Effect    = "Allow"
        Action    = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource  = aws_kms_key.this["s3"].arn
        Condition = { StringEquals = { "kms:ViaService" = "s3.${local.region}.${local.dns_suffix}" } }
      },
      local.statement.redis_token,
      local.statement.secrets_key,
      local.statement.db_as_app,
    ]
    migrations = [
      {
        Effect   = "Allow"
        Action   = "secretsmanager:GetSecretValue"
        Resource = aws_rds_cluster.this.master_user_secret[0].secret_arn
      },
      local.statement.secrets_key,
    ]
    inference = []
    lb_bindings = [
      {
        Effect   = "Allow"
        Action   = ["elasticloadbalancing:RegisterTargets", "elasticloadbalancing:DeregisterTargets"]
        Resource = aws_lb_target_group.api.arn
      },
      {
        # Describe calls cannot be scoped to a resource.
        Effect = "Allow"
        Action = [
          "elasticloadbalancing:DescribeListeners",
          "elasticloadbalancing:DescribeLoadBalancers",
          "elasticloadbalancing:DescribeTags",
          "elasticloadbalancing:DescribeTargetGroupAttributes",
          "elasticloadbalancing:DescribeTargetGroups",
          "elasticloadbalancing:DescribeTargetHealth",
          "ec2:DescribeAvailabilityZones",
          "ec2:DescribeInstances",
          "ec2:DescribeNetworkInterfaces",
          "ec2:DescribeSecurityGroups",
          "ec2:DescribeSubnets",
          "ec2:DescribeVpcs",
        ]
        Resource = "*"
      },
    ]
  }
}

resource "aws_iam_role" "workload" {
  for_each = local.irsa_subjects

  name                 = "${local.global_name}-${replace(each.key, "_", "-")}"
  description          = "IRSA role of ${each.value} in the ${local.cluster_name} cluster"
  assume_role_policy   = local.irsa_trust[each.value]
  max_session_duration = 3600
  tags                 = merge(local.tags, { "firstmile:workload" = each.key })
}

resource "aws_iam_role_policy" "workload" {
  for_each = {
    for w, statements in local.irsa_statements : w => jsonencode({
      Version   = "2012-10-17"
      Statement = statements
    }) if length(statements) > 0
  }

  name   = "${each.key}-least-privilege"
  role   = aws_iam_role.workload[each.key].id
  policy = each.value
}
