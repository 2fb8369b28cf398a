"""SEMINAR and baseline models as plain nn.Modules (paper §3.3); no Ray imports."""
