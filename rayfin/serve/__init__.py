"""Ray Serve application and FastAPI ingress (issue: serving). Nothing here yet."""
