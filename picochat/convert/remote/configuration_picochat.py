"""The configuration of a picochat model exported for transformers (`picochat export --format hf`),
for the picochat features transformers' own NanoChat architecture lacks: sliding-window layers,
the per-layer residual and x0 scalars, value embeddings, smear, backout and scaled queries and
keys. Loaded with trust_remote_code=True."""

from transformers import PretrainedConfig


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=32768, hidden_size=768, num_hidden_layers=12, num_attention_heads=6,
                 num_key_value_heads=6, max_position_embeddings=2048, intermediate_size=None, layer_types=None,
                 sliding_window=None, rope_theta=10000.0, final_logit_softcapping=15.0,
                 rms_norm_eps=1.1920928955078125e-07, qk_scale=1.0, value_embed_layers=None, smear=False,
                 backout_layer=None,
                 use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        # per layer "full_attention" (every earlier key) or "sliding_attention": the last sliding_window
        # keys counting the query's own, transformers' convention (its masks, caches and kernels read them)
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * num_hidden_layers
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.qk_scale = qk_scale  # queries and keys times this after QK-norm
        self.value_embed_layers = list(value_embed_layers or [])  # layers with value embeddings
        self.smear = smear  # the previous token's embedding mixed into each token's
        self.backout_layer = backout_layer  # the layer whose output is subtracted before the head, or None
        self.final_logit_softcapping = final_logit_softcapping
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
