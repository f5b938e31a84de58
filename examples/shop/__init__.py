"""The shop: orders, payments, customers and call-centre calls, with its stateful steps."""
