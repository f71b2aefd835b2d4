// Test fixture only: a truth-table driver around cyclonus's NetworkPolicy engine, the
// independent oracle tortie's policy evaluator is compared against (tests/policy_oracle.rs).
module tortie.test/oracle

go 1.22

require github.com/mattfenwick/cyclonus v0.5.6
