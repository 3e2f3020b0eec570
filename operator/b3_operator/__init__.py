"""The kopf operator for B3Job resources (imported as `b3_operator`).

It reads the job spec from `b3.spec`, the one model shared with the CLI and the stage
programs; `b3 schema` prints the schema its CRD is generated from.
"""
