import math

import numpy as np
import pytest

from tests.conftest import LLAMA

from edge_awq.config import ModelArgs, RopeScaling, from_hf_config, rope_frequencies
from edge_awq.errors import ConfigError

def test_llama_config_fields():
    a = from_hf_config(LLAMA)
    assert (a.arch, a.dim, a.hidden_dim, a.n_layers, a.head_dim, a.max_seq_len) == ("llama", 4096, 11008, 32, 128, 4096)
    assert a.rope_theta == 10000.0 and not a.tied_embeddings and not a.qkv_bias and not a.rope_interleaved


def test_gqa_qwen2_bias_and_tied():
    cfg = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 4, "tie_word_embeddings": True,
           "sliding_window": 4096, "use_sliding_window": False}
    a = from_hf_config(cfg)
    assert a.arch == "qwen2" and a.qkv_bias and a.n_kv_heads == 4 and a.tied_embeddings and a.max_seq_len == 4096


def test_mistral_sliding_window_caps_context():
    a = from_hf_config({**LLAMA, "architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768,
                        "sliding_window": 4096})
    assert a.arch == "mistral" and a.max_seq_len == 4096


@pytest.mark.parametrize("cfg,words", [
    ({**LLAMA, "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel"),
    ({**LLAMA, "architectures": ["MixtralForCausalLM"]}, "unsupported architecture"),
    ({**LLAMA, "num_local_experts": 8}, "mixture-of-experts"),
    ({**LLAMA, "mlp_bias": True}, "mlp_bias"),
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
    ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
    ({**LLAMA, "num_key_value_heads": 5}, "not a multiple"),
])
def test_refusals_name_the_problem(cfg, words):
    with pytest.raises(ConfigError, match=words):
        from_hf_config(cfg)


def test_rope_frequencies_plain():
    a = from_hf_config({**LLAMA, "rope_theta": 500000.0})
    inv = rope_frequencies(a)
    assert inv.shape == (64,) and inv.dtype == np.float32
    assert inv[0] == 1.0 and math.isclose(inv[1], 500000.0 ** (-2 / 128), rel_tol=1e-6)


def test_rope_frequencies_llama3_scaling():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    a = from_hf_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": rs})
    base = rope_frequencies(from_hf_config({**LLAMA, "rope_theta": 500000.0}))
    inv = rope_frequencies(a)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4.0  # short wavelengths: untouched
    low = wavelen > 8192 / 1.0  # long wavelengths: divided by the factor
    assert np.array_equal(inv[high], base[high])
    np.testing.assert_allclose(inv[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(inv[mid] < base[mid]) and np.all(inv[mid] > base[mid] / 8.0)


def test_args_round_trip_through_dict():
    a = ModelArgs("llama", 64, 172, 5, 8, 4, 8, 512, 512, rope_scaling=RopeScaling("linear", 2.0))
    assert ModelArgs.from_dict(a.to_dict()) == a


def test_transformers5_rope_parameters_are_read():
    """transformers 5 writes theta and scaling inside rope_parameters, with no top-level rope_theta."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0).to_dict()
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == 100000.0
    a = from_hf_config(cfg)
    assert a.rope_theta == 100000.0 and a.rope_scaling is None
    scaled = from_hf_config({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192}})
    assert scaled.rope_theta == 500000.0 and scaled.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    per_type = from_hf_config({**LLAMA, "rope_parameters": {"full_attention": {"rope_type": "default",
                                                                               "rope_theta": 1e6}}})
    assert per_type.rope_theta == 1e6


@pytest.mark.parametrize("rope,words", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "without its factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, "fix the one"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}, "sliding_attention": {"rope_theta": 1e6}}},
     "differ between layer types"),
    ({"rope_parameters": "default"}, "rope_parameters = .default.: Input should be a valid dictionary"),
])
def test_rope_settings_not_understood_are_refused(rope, words):
    with pytest.raises(ConfigError, match=words):
        from_hf_config({**LLAMA, **rope})


@pytest.mark.parametrize("args", [
    ModelArgs("llama", 64, 172, 5, 8, 4, 8, 512, 512, tied_embeddings=True),
    ModelArgs("llama", 4096, 14336, 32, 32, 8, 128, 128256, 8192, rope_theta=500000.0,
              rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    ModelArgs("qwen2", 896, 4864, 24, 14, 2, 64, 151936, 32768, rope_theta=1e6, qkv_bias=True, tied_embeddings=True),
    ModelArgs("mistral", 4096, 14336, 32, 32, 8, 128, 32000, 32768, rope_scaling=RopeScaling("linear", 2.0)),
])
def test_hf_config_round_trip(args):
    """to_hf_config writes what from_hf_config reads back, and what transformers reads as the same model."""
    from transformers import AutoConfig

    from edge_awq.config import to_hf_config

    cfg = to_hf_config(args, 1, (2,))
    assert from_hf_config(cfg) == args
    theirs = AutoConfig.for_model(**cfg).to_dict()
    assert from_hf_config(theirs) == args
