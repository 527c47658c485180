"""Deployment checks: kustomize builds, schemas, Prometheus rules, dashboard, images."""
