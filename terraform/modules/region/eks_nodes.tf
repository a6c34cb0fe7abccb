################################################################################
# Managed node groups: "general" for the platform, "gpu" for the Ray GPU workers.
# Both use launch templates that require IMDSv2 with a hop limit of 1 (so pods cannot borrow
# the node's role; they have their own through IRSA) and encrypt their volumes with the ebs key.
################################################################################

locals {
  # The chart's inference values select and tolerate exactly these (outputs.gpu_node_selector,
  # outputs.gpu_node_taint).
  gpu_node_labels = {
    "firstmile.io/node-pool" = "gpu"
    "nvidia.com/gpu.present" = "true"
  }
  gpu_node_taint = {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }

  node_groups = {
    general = merge(var.eks.general_nodes, {
      ami_type        = "AL2023_x86_64_STANDARD"
      labels          = { "firstmile.io/node-pool" = "general" }
      taints          = []
      autoscaler_tags = {}
    })
    # The accelerated AL2023 AMI ships the NVIDIA driver and container toolkit; the NVIDIA
    # device plugin (a DaemonSet) advertises nvidia.com/gpu to the scheduler.
    gpu = merge(var.eks.gpu_nodes, {
      ami_type = "AL2023_x86_64_NVIDIA"
      labels   = local.gpu_node_labels
      taints   = [local.gpu_node_taint]
      # Scale-from-zero hints for the Cluster Autoscaler: without them it cannot know that an
      # empty group would bring GPUs with this label and taint.
      autoscaler_tags = {
        "k8s.io/cluster-autoscaler/node-template/label/firstmile.io/node-pool" = "gpu"
        "k8s.io/cluster-autoscaler/node-template/label/nvidia.com/gpu.present" = "true"
        "k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"         = "true:NoSchedule"
      }
    })
  }
}

resource "aws_iam_role" "node" {
  name               = "${local.global_name}-eks-node"
  assume_role_policy = local.service_trust["ec2"]
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset(["AmazonEKSWorkerNodePolicy", "AmazonEC2ContainerRegistryReadOnly"])

  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

resource "aws_launch_template" "node" {
  for_each = local.node_groups

  name_prefix            = "${local.name}-${each.key}-"
  update_default_version = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = each.value.disk_size_gb
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = aws_kms_key.this["ebs"].arn
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${local.name}-${each.key}" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${local.name}-${each.key}" })
  }

  tags = local.tags
}

resource "aws_eks_node_group" "this" {
  for_each = local.node_groups

  cluster_name    = aws_eks_cluster.this.name
  node_group_name = each.key
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = [for s in aws_subnet.private : s.id]
  ami_type        = each.value.ami_type
  capacity_type   = each.value.capacity_type
  instance_types  = each.value.instance_types
  labels          = each.value.labels

  dynamic "taint" {
    for_each = each.value.taints
    content {
      key    = taint.value.key
      value  = taint.value.value
      effect = taint.value.effect
    }
  }

  scaling_config {
    min_size     = each.value.min_size
    desired_size = each.value.desired_size
    max_size     = each.value.max_size
  }

  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }

  update_config {
    max_unavailable_percentage = 33
  }

  tags = merge(local.tags, each.value.autoscaler_tags)

  # The Cluster Autoscaler owns desired_size once the group runs.
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node, aws_eks_addon.vpc_cni]
}
