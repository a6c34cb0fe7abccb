################################################################################
# EKS control plane: private endpoint by default, Kubernetes secrets encrypted with the
# region's eks key, every control-plane log type kept, access through access entries only.
################################################################################

locals {
  cluster_name = local.name

  cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
}

resource "aws_iam_role" "eks_cluster" {
  name               = "${local.global_name}-eks-cluster"
  assume_role_policy = local.service_trust["eks"]
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "eks_cluster" {
  role       = aws_iam_role.eks_cluster.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

resource "aws_iam_role_policy" "eks_cluster_kms" {
  name = "encrypt-kubernetes-secrets"
  role = aws_iam_role.eks_cluster.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["kms:Encrypt", "kms:Decrypt", "kms:ListGrants", "kms:DescribeKey"]
      Resource = aws_kms_key.this["eks"].arn
    }]
  })
}

resource "aws_eks_cluster" "this" {
  name     = local.cluster_name
  version  = var.eks.kubernetes_version
  role_arn = aws_iam_role.eks_cluster.arn

  enabled_cluster_log_types = local.cluster_log_types

  access_config {
    authentication_mode                         = "API"
    bootstrap_cluster_creator_admin_permissions = false
  }

  vpc_config {
    subnet_ids              = [for s in aws_subnet.private : s.id]
    endpoint_private_access = true
    endpoint_public_access  = var.eks.endpoint_public_access
    public_access_cidrs     = var.eks.endpoint_public_access ? var.eks.public_access_cidrs : null
  }

  encryption_config {
    resources = ["secrets"]
    provider {
      key_arn = aws_kms_key.this["eks"].arn
    }
  }

  upgrade_policy {
    support_type = "STANDARD"
  }

  tags = local.tags

  depends_on = [
    aws_cloudwatch_log_group.this,
    aws_iam_role_policy_attachment.eks_cluster,
    aws_iam_role_policy.eks_cluster_kms,
  ]
}

# IRSA: pods exchange their projected service-account token for their workload's role.
resource "aws_iam_openid_connect_provider" "eks" {
  url            = aws_eks_cluster.this.identity[0].oidc[0].issuer
  client_id_list = ["sts.${local.dns_suffix}"]
  tags           = local.tags
}

resource "aws_eks_access_entry" "admin" {
  for_each = toset(var.eks.admin_principal_arns)

  cluster_name  = aws_eks_cluster.this.name
  principal_arn = each.value
  type          = "STANDARD"
  tags          = local.tags
}

resource "aws_eks_access_policy_association" "admin" {
  for_each = toset(var.eks.admin_principal_arns)

  cluster_name  = aws_eks_cluster.this.name
  principal_arn = aws_eks_access_entry.admin[each.value].principal_arn
  policy_arn    = "arn:${local.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"

  access_scope {
    type = "cluster"
  }
}

################################################################################
# Core add-ons, managed by EKS. The VPC CNI gets its own IRSA role rather than the node role,
# and enforces Kubernetes NetworkPolicies (the chart's default-deny and allow-lists): with
# enableNetworkPolicy EKS runs the policy controller and the aws-node pods their eBPF agent.
# Without it the policies are accepted by the API server and enforced by nothing.
################################################################################

resource "aws_eks_addon" "vpc_cni" {
  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = "vpc-cni"
  service_account_role_arn    = aws_iam_role.vpc_cni.arn
  resolve_conflicts_on_update = "OVERWRITE"
  configuration_values        = jsonencode({ enableNetworkPolicy = "true" })
  tags                        = local.tags
}

resource "aws_eks_addon" "core" {
  for_each = toset(["kube-proxy", "coredns"])

  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = each.value
  resolve_conflicts_on_update = "OVERWRITE"
  tags                        = local.tags

  # CoreDNS needs nodes to schedule on.
  depends_on = [aws_eks_node_group.this]
}

resource "aws_iam_role" "vpc_cni" {
  name               = "${local.global_name}-vpc-cni"
  assume_role_policy = local.irsa_trust["kube-system/aws-node"]
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "vpc_cni" {
  role       = aws_iam_role.vpc_cni.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonEKS_CNI_Policy"
}
