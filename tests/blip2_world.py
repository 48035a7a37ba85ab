"""A tiny, randomly initialised BLIP-2 checkpoint directory in Hugging Face format, written by the
tests with ``transformers`` itself (the reference implementation): ``config.json`` and weights
from ``Blip2ForImageTextRetrieval.save_pretrained``, the Q-Former's BERT tokenizer files and the
image processor's config, i.e. what a user's ``Salesforce/blip2-itm-vit-g`` download holds, at
toy size.
"""

from __future__ import annotations

from pathlib import Path

# The words of the tiny BERT vocabulary (lower case, whole words: every test caption uses these).
TOKEN_WORDS = ("a the red green blue yellow purple orange square circle triangle star cross "
               "moves left right up down spins stays still appears early late small big "
               "object thing and with on in of is").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# vision: 32x32 images, 8x8 patches -> 1 + 16 tokens of width 24; Q-Former 32 wide, 4 queries
TINY_BLIP2 = dict(image_size=32, patch_size=8, vision_hidden=24, vision_layers=2,
                  qformer_hidden=32, qformer_layers=2, heads=2, num_queries=4, embed_dim=16,
                  cross_attention_frequency=2, max_positions=40)


def write_tokenizer(directory: Path) -> Path:
    """A lower-casing BERT WordPiece tokenizer over :data:`TOKEN_WORDS`, saved as transformers
    saves BLIP-2's (``tokenizer.json``, ``tokenizer_config.json``)."""
    from transformers import BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + list(TOKEN_WORDS)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.save_pretrained(directory)
    return directory


def blip2_config(**overrides):
    """The tiny ``Blip2Config`` (keys of :data:`TINY_BLIP2` may be overridden)."""
    from transformers import Blip2Config

    s = {**TINY_BLIP2, **overrides}
    vocab = len(SPECIAL) + len(TOKEN_WORDS)
    return Blip2Config(
        vision_config=dict(hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                           num_hidden_layers=s["vision_layers"], num_attention_heads=s["heads"],
                           image_size=s["image_size"], patch_size=s["patch_size"],
                           qkv_bias=True, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=s["qformer_hidden"], num_hidden_layers=s["qformer_layers"],
                            num_attention_heads=s["heads"],
                            intermediate_size=2 * s["qformer_hidden"],
                            cross_attention_frequency=s["cross_attention_frequency"],
                            encoder_hidden_size=s["vision_hidden"], vocab_size=vocab,
                            max_position_embeddings=s["max_positions"], pad_token_id=0,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            use_qformer_text_input=True),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=32, vocab_size=vocab,
                         max_position_embeddings=32, word_embed_proj_dim=16),
        num_query_tokens=s["num_queries"], image_text_hidden_size=s["embed_dim"])


def make_blip2_dir(directory: Path, seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised ``Blip2ForImageTextRetrieval`` with its tokenizer and image
    processor config into ``directory``; return it."""
    import torch
    from transformers import BlipImageProcessor, Blip2ForImageTextRetrieval

    directory = Path(directory)
    config = blip2_config(**overrides)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith(("LayerNorm.weight", "layernorm.weight", "layer_norm1.weight",
                              "layer_norm2.weight", "post_layernorm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    size = config.vision_config.image_size
    BlipImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)
    return directory


def load_reference(directory: Path):
    """The reference model, loaded by transformers from ``directory`` (eval mode)."""
    from transformers import Blip2ForImageTextRetrieval

    return Blip2ForImageTextRetrieval.from_pretrained(directory).eval()
