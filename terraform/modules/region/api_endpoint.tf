################################################################################
# The region's API endpoint: an internet-facing ALB (TLS 1.2+ with an ACM certificate, WAF,
# access logs) in front of the API pods. The ALB and its target group belong to Terraform; the
# AWS Load Balancer Controller only registers the API pods in the target group (a
# TargetGroupBinding of the chart). Route 53 answers api.<domain> with the nearest healthy
# region (latency routing) and <region>.api.<domain> with this region only.
################################################################################

locals {
  api_shared_fqdn = "${var.dns.api_name}.${var.dns.domain_name}"
  api_region_fqdn = "${local.region}.${var.dns.api_name}.${var.dns.domain_name}"
  api_port        = 8000
}

resource "aws_acm_certificate" "api" {
  domain_name               = local.api_region_fqdn
  subject_alternative_names = [local.api_shared_fqdn]
  validation_method         = "DNS"
  key_algorithm             = "EC_prime256v1"
  tags                      = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

# ACM gives a domain name the same validation record in every region of an account: the
# region-specific name is validated here, the shared name only by the region that owns it.
resource "aws_route53_record" "api_validation" {
  for_each = {
    for o in aws_acm_certificate.api.domain_validation_options : o.domain_name => o
    if o.domain_name == local.api_region_fqdn || var.dns.owns_shared_validation
  }

  zone_id         = var.dns.zone_id
  name            = each.value.resource_record_name
  type            = each.value.resource_record_type
  records         = [each.value.resource_record_value]
  ttl             = 300
  allow_overwrite = false
}

# No validation_record_fqdns: in a region that does not own the shared name the list would
# miss that name's record, which the provider refuses. ACM itself waits for every name.
resource "aws_acm_certificate_validation" "api" {
  certificate_arn = aws_acm_certificate.api.arn
  depends_on      = [aws_route53_record.api_validation]
}

resource "aws_security_group" "alb" {
  name        = "${local.name}-api-alb"
  description = "Public load balancer of the ${local.name} API: HTTPS in, the API pods out"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-api-alb" })
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.api_allowed_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from API clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "alb_to_pods" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To the API pods"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.api_port
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "pods_from_alb" {
  security_group_id            = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
  description                  = "API pods from the public load balancer"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.api_port
  referenced_security_group_id = aws_security_group.alb.id
}

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_76:The Log4j rules (AWSManagedRulesKnownBadInputsRuleSet) are on the Web ACL; this check also demands AWSManagedRulesAnonymousIpList, whose hosting-provider list would block tenants' servers that call the API from cloud hosts.
  name               = "${local.name}-api"
  load_balancer_type = "application"
  internal           = false
  subnets            = [for s in aws_subnet.public : s.id]
  security_groups    = [aws_security_group.alb.id]

  drop_invalid_header_fields = true
  enable_deletion_protection = true
  idle_timeout               = 60

  access_logs {
    bucket  = aws_s3_bucket.logs.id
    prefix  = "alb"
    enabled = true
  }

  tags = local.tags

  depends_on = [aws_s3_bucket_policy.logs]
}

# Plain HTTP behind the load balancer, inside the VPC: the pods serve 8000 (docs: the API's
# probes and metrics share it) and only the ALB's security group may reach it.
resource "aws_lb_target_group" "api" {
  name                 = "${local.name}-api"
  target_type          = "ip"
  protocol             = "HTTP"
  port                 = local.api_port
  vpc_id               = aws_vpc.this.id
  deregistration_delay = 30

  health_check {
    path                = "/health/ready"
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = aws_acm_certificate_validation.api.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }

  tags = local.tags
}

################################################################################
# WAF on the load balancer: AWS's common and known-bad-inputs rules, and a per-IP rate limit.
################################################################################

resource "aws_wafv2_web_acl" "api" {
  name        = "${local.name}-api"
  description = "${local.name} API"
  scope       = "REGIONAL"

  default_action {
    allow {}
  }

  rule {
    name     = "aws-common"
    priority = 10
    override_action {
      none {}
    }
    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesCommonRuleSet"
        # Onboarding events and manifests are JSON bodies above the rule's 8 KB default.
        rule_action_override {
          name = "SizeRestrictions_BODY"
          action_to_use {
            count {}
          }
        }
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${local.name}-api-aws-common"
      sampled_requests_enabled   = true
    }
  }

  rule {
    name     = "aws-known-bad-inputs"
    priority = 20
    override_action {
      none {}
    }
    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesKnownBadInputsRuleSet"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${local.name}-api-known-bad-inputs"
      sampled_requests_enabled   = true
    }
  }

  rule {
    name     = "rate-limit-per-ip"
    priority = 30
    action {
      block {}
    }
    statement {
      rate_based_statement {
        limit              = var.api_rate_limit_per_5min
        aggregate_key_type = "IP"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${local.name}-api-rate-limit"
      sampled_requests_enabled   = true
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = "${local.name}-api"
    sampled_requests_enabled   = true
  }

  tags = local.tags
}

resource "aws_wafv2_web_acl_association" "api" {
  resource_arn = aws_lb.api.arn
  web_acl_arn  = aws_wafv2_web_acl.api.arn
}

resource "aws_wafv2_web_acl_logging_configuration" "api" {
  resource_arn            = aws_wafv2_web_acl.api.arn
  log_destination_configs = [aws_cloudwatch_log_group.this["waf"].arn]

  redacted_fields {
    single_header {
      name = "authorization"
    }
  }
}

################################################################################
# DNS
################################################################################

resource "aws_route53_record" "api_latency" {
  zone_id        = var.dns.zone_id
  name           = local.api_shared_fqdn
  type           = "A"
  set_identifier = local.region

  latency_routing_policy {
    region = local.region
  }

  # An unhealthy region (no healthy API target) drops out of the answers.
  alias {
    name                   = aws_lb.api.dns_name
    zone_id                = aws_lb.api.zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "api_region" {
  zone_id = var.dns.zone_id
  name    = local.api_region_fqdn
  type    = "A"

  alias {
    name                   = aws_lb.api.dns_name
    zone_id                = aws_lb.api.zone_id
    evaluate_target_health = true
  }
}
