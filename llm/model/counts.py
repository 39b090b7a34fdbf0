"""Exact parameter and training-FLOP counts of a model config (what sweeps, MFU and the fits use)."""

from llm.model.transformer import ModelConfig


def _mlp_sublayer_params(cfg: ModelConfig) -> int:
    """A block's MLP and the norm before it; none in an attention-only block (F = 0)."""
    if not cfg.F:
        return 0
    norm = cfg.D * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    return norm + cfg.D * cfg.F * (3 if cfg.mlp == "swiglu" else 2)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact counts; non-embedding excludes the token and position embeddings and an untied head."""
    norm = cfg.D * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    attn = cfg.D * cfg.K * (2 * cfg.H + 2 * cfg.G)
    mlp = _mlp_sublayer_params(cfg)
    non_embedding = cfg.N * (norm + attn + mlp) + norm
    positions = cfg.L
    if cfg.arch == "encoder_decoder":
        non_embedding += cfg.N * (norm + attn) + cfg.E * (norm + attn + mlp) + norm  # cross-attention; the encoder
        positions += cfg.T
    embedding = cfg.V * cfg.D
    embedding += positions * cfg.D if cfg.pos_encoding == "learned" else 0
    embedding += 0 if cfg.tie_embeddings else cfg.D * cfg.V
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 6 x (matmul params incl. the output head) + 12 N H K L for attention.

    The attention term counts the full L x L score matrix (PaLM's convention, also nanoGPT's MFU), for
    bidirectional encoders as for causal decoders. An encoder-decoder's token is a position of the
    encoder's input (L per row, as batch_size x seq_len counts them): the FLOPs of a whole row, the
    encoder's L tokens, the decoder's T and cross-attention's T x L scores, divided by L.
    """
    if cfg.arch != "encoder_decoder":
        matmul_params = param_counts(cfg)["non_embedding"] + cfg.D * cfg.V
        return 6 * matmul_params + 12 * cfg.N * cfg.H * cfg.K * cfg.L
    norm = cfg.D * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    q_o, k_v = 2 * cfg.D * cfg.H * cfg.K, 2 * cfg.D * cfg.G * cfg.K
    mlp = _mlp_sublayer_params(cfg)
    # Cross-attention's keys and values are projections of the encoder's tokens, its queries the decoder's.
    per_encoder_token = cfg.E * (norm + q_o + k_v + mlp) + norm + cfg.N * k_v
    per_decoder_token = cfg.N * (2 * norm + 2 * q_o + k_v + mlp) + norm + cfg.D * cfg.V
    scores = 12 * cfg.H * cfg.K * (cfg.E * cfg.L * cfg.L + cfg.N * cfg.T * cfg.T + cfg.N * cfg.T * cfg.L)
    return round((6 * (per_encoder_token * cfg.L + per_decoder_token * cfg.T) + scores) / cfg.L)
