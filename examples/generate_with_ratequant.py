"""Generate with a mixed-precision KV cache and compare its bytes with the 16-bit cache.

    python examples/generate_with_ratequant.py                      # embedded SmolLM2-135M, its shipped calibration
    python examples/generate_with_ratequant.py --config my-config   # a folder saved by `hf-ratequant calibrate`
    python examples/generate_with_ratequant.py --model Qwen/Qwen3-0.6B   # no config: keys 3 / values 2 bits
"""

import argparse

import torch

from hf_ratequant import DEFAULT_MODEL, RateQuantCache, RateQuantConfig, default_config_path, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local folder or 'smollm2' (embedded)")
    parser.add_argument("--config", help="saved RateQuantConfig folder or Hub repo id (default: the calibrated kivi "
                        "2.5-bit config shipped for the embedded model; keys 3 / values 2 bits for other models)")
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper who finds a map.")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    config = args.config or (default_config_path() if args.model == DEFAULT_MODEL else None)
    if config:
        cache = RateQuantCache.from_pretrained(config, model=model)
    else:
        quant = RateQuantConfig.uniform(model.config, key_bits=3, value_bits=2, residual_length=32)
        cache = RateQuantCache(config=model.config, quant_config=quant)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=True,
                             temperature=0.7, top_p=0.9)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print(f"\n{cache.get_seq_length()} tokens cached in {cache.nbytes / 2**20:.2f} MiB "
          f"({cache.nbytes / cache.nbytes_16bit():.2f}x the same cache in 16-bit; the model runs in {model.dtype})")


if __name__ == "__main__":
    main()
