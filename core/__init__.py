"""wsg.core: the ground floor. The vocabulary every stage shares (config schema,
run layout and its I/O, cell identity, errors, model registry, Ray session,
console, tracking); it imports no stage (docs/design.md)."""
