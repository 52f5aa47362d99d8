"""Privacy: DP-FedAvg's mechanism (dp) and the accountant (accounting), sample-level DP-SGD
(dpsgd), the secure sum (secagg with shamir and fixedpoint, or CKKS in he), the private
release of a round (aggregation) and of an evaluation (evaluation), the secret randomness
they draw from, and the membership-inference attacks that measure what a model leaks."""
