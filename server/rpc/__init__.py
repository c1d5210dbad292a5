"""The gRPC surface: servicers, proto ⇄ domain mapping, subscriptions, and how errors and
undecodable requests become statuses."""
