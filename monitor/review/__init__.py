"""Human review: users and sessions, the claim/label queue, admin statistics, exports, web app."""
