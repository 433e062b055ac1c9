"""encode: prompts -> text conditioning (every text encoder of the family, pooled embedding included), real images ->
VAE latents, cached as sharded safetensors. No later stage runs a text encoder or the VAE encoder."""
from pathlib import Path


from fewstep.files import atomic_output
from fewstep.io import write_json, write_shards
from fewstep.families.t2i import encode, variants, prompts, encoded, teacher


def main(params, args, device):
    t, p, e = params.teacher, params.prompts, params.encode
    path = teacher.resolve(t.path, t.family)
    train, held_out = prompts.split(prompts.load_prompts(p.source, p.text_column, p.image_column),
                                    p.eval_count, params.seed, p.max_prompts)
    resolution = e.resolution or teacher.native_resolution(path)
    latent_shape = teacher.latent_shape(path, resolution, t.family)
    print(f"[encode] {t.family} teacher {path}: {len(train.texts)} train / {len(held_out.texts)} held-out prompts, "
          f"{resolution}px, real images: {'yes' if train.images else 'no'}", flush=True)
    pipe = teacher.load_text_pipeline(path, t.family).to(device)
    vae = teacher.load_vae(path) if train.images else None
    dtype = encoded.DTYPES[e.dtype]
    with atomic_output(args.out) as out:
        out.mkdir()
        index = {"family": t.family, "teacher": str(t.path), "resolution": resolution, "latent_shape": latent_shape,
                 "time_ids": encode.sdxl_time_ids(resolution) if variants.get(t.family).time_ids else None}
        for name, split in (("train", train), ("eval", held_out)):
            cond = encode.encode_texts(pipe, split.texts, t.family, e.batch_size, device)
            columns = {"embeds": cond.embeds, "pooled": cond.pooled}
            if vae is not None:
                columns["latents"] = encode.to_latents(vae, prompts.image_tensor(split.images, resolution),
                                                       e.batch_size, device)
            columns = {k: v for k, v in columns.items() if v is not None}
            index[name] = {"prompts": split.texts,
                           "shards": write_shards(out, name, columns, e.shard_size, dtype)}
        encoded.save_cond(encode.encode_negative(pipe, e.negative_prompt, t.family, device),
                        out / "negative.safetensors", dtype)
        write_json(index, out / "index.json")
    print(f"[encode] {len(index['train']['shards'])} train + {len(index['eval']['shards'])} eval shards -> {args.out}",
          flush=True)


def configure(ap):
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("encode", main, configure)
