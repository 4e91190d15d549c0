#!/usr/bin/env bash
# One time-boxed GPU lease of training (docs/training.md, "On a lent GPU"):
#
#   bin/train_gpu.sh PACKED_CORPUS INIT_RELEASE OUT_DIR SECONDS [decoder|full|recipe]
#
# first runs the GPU tests (`pytest -m gpu`, log in OUT_DIR/gpu-tests.log), unpacks the corpus
# carried by bin/pack_corpus.py, then, bounded by the clock:
# decoder (the default): two fine-tunings of INIT_RELEASE's decoder side by side on the one GPU (a
#   model this small leaves it mostly idle): `p` with the reconstruction losses only, `g`
#   adversarially (discriminator warm-up first) in three resumed stretches. The encoder and
#   codebooks stay frozen, so the codes and the shipped LM stay valid. Leaves
#   OUT_DIR/{p,g1,g2,g3}.safetensors (codec weights at each stretch's end).
# full: the whole codec (encoder, codebooks, decoder) with the reconstruction losses for 70 % of
#   the time, then its LM, from INIT_RELEASE's, on the new codes. Leaves the release package as
#   OUT_DIR/full.json and OUT_DIR/full.safetensors.part-a* (split under the 16 MiB a returned file
#   may have; `cat` them back together).
# recipe: the whole codec with configs/neucodec_24khz_v2.json (the paper's balancer weights and
#   Adam, the MS-STFT discriminator, commitment averaged over codebooks, a latent of 128
#   dimensions widened from INIT_RELEASE's), adversarially from the start (discriminator warm-up
#   first), the quantizer bypassed for the first WARM steps (2000) and its codebooks k-means
#   initialised afresh then. WHITEN=1 whitens the widened latent first (same function, train/widen.py)
#   and again when the quantizer starts (TrainConfig.whiten_at).
#   Extra `--set` overrides in the environment variable SET. Leaves OUT_DIR/recipe.json and
#   OUT_DIR/recipe.safetensors.part-a* (`cat` them back together), and OUT_DIR/checkpoint.pt.part-a*
#   (optimizer and discriminator state, to resume).
# All leave OUT_DIR/runs.tgz (release JSON files and logs).
set -u
packed=$1 init=$2 out=$3 budget=$4 mode=${5:-decoder}
end=$(($(date +%s) + budget - 20))  # 20 s to pack the results
corpus=/tmp/neucodec-corpus work=/tmp/neucodec-gpu
mkdir -p "$out" "$work"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -n 1 "$out/gpu-tests.log"))"
python3 bin/pack_corpus.py unpack "$packed" "$corpus" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
step=$(python3 -c "import json; print(json.load(open('$init'))['training']['steps'])")

gpu=(batch_size=${BATCH:-64} loader_workers=6 eval_every=0 log_every=100 checkpoint_every=1000000)
plain=(--config configs/neucodec_24khz_gan.json --set adversarial=false lr=3e-4 'betas=[0.9,0.999]' "${gpu[@]}")
adv=(--config configs/neucodec_24khz_gan.json --set "${gpu[@]}" adversarial_start="$step"
     disc_warmup="${WARMUP:-300}" disc_filters=32 lr=2e-4 disc_lr=3e-4)
overhead=20  # seconds a train.py start, final checkpoint and export take, about

train() {  # UNTIL NAME EXPORT ARGS...: one train.py run, its checkpoint in $work/run-NAME, that stops by UNTIL (epoch s)
    local until=$1 name=$2 export=$3; shift 3
    local hours; hours=$(python3 -c "import time; print(max($until - time.time() - $overhead, 5) / 3600)")
    python3 bin/train.py --corpus "$corpus" --device "${DEVICE:-cuda}" --threads 3 --run-dir "$work/run-$name" \
        --init-from "$init" --export "$work/$export/neucodec_24khz.json" --max-hours "$hours" "$@"
}
run() {  # UNTIL NAME EXPORT ARGS...: train, once more in float32 if bf16 autocast failed
    train "$@" || train "$@" bf16=false
}

if [ "$mode" = recipe ]; then
    dim=$(python3 -c "import json; print(json.load(open('configs/neucodec_24khz_v2.json'))['codec']['seanet']['dimension'])")
    # shellcheck disable=SC2086
    run "$end" r r --config configs/neucodec_24khz_v2.json --latent-dim "$dim" ${WHITEN:+--whiten-latent} \
        --set "${gpu[@]}" adversarial_start="$step" disc_filters=32 \
        quantizer_start="$((step + ${WARM:-2000}))" reinit_codebooks="$((step + ${WARM:-2000}))" \
        ${WHITEN:+whiten_at=$((step + ${WARM:-2000}))} ${SET:-} \
        > "$work/r.log" 2>&1
    cp "$work/r/neucodec_24khz.json" "$out/recipe.json"
    split -b 15m "$work/r/neucodec_24khz.safetensors" "$out/recipe.safetensors.part-"
    split -b 15m "$work/run-r/checkpoint.pt" "$out/checkpoint.pt.part-"
elif [ "$mode" = full ]; then
    now=$(date +%s)
    run $((now + (end - now) * 7 / 10)) f f --config configs/neucodec_24khz.json --set "${gpu[@]}" lr=3e-4 \
        > "$work/f.log" 2>&1
    hours=$(python3 -c "import time; print(max($end - time.time() - 60, 10) / 3600)")  # 60 s: coding, export
    python3 bin/train_lm.py --codec "$work/f/neucodec_24khz.json" --init-from "$init" --corpus "$corpus" \
        --device "${DEVICE:-cuda}" --run-dir "$work/run-lm" --steps 1000000 --max-hours "$hours" \
        --batch-size 64 --crops "${CROPS:-128}" --lr 3e-4 --export "$work/full/neucodec_24khz.json" > "$work/lm.log" 2>&1
    cp "$work/full/neucodec_24khz.json" "$out/full.json"
    split -b 15m "$work/full/neucodec_24khz.safetensors" "$out/full.safetensors.part-"
else
    run "$end" p p "${plain[@]}" > "$work/p.log" 2>&1 &
    (
        now=$(date +%s)
        for i in 1 2 3; do
            run $((now + (end - now) * i / 3)) g "g$i" "${adv[@]}" || break
        done
    ) > "$work/g.log" 2>&1 &
    wait
    for name in p g1 g2 g3; do
        [ -f "$work/$name/neucodec_24khz.safetensors" ] && mv "$work/$name/neucodec_24khz.safetensors" "$out/$name.safetensors"
    done
fi
for run_dir in "$work"/run-*; do cp "$run_dir/log.csv" "$work/log_${run_dir##*-}.csv" 2>/dev/null; done
tar czf "$out/runs.tgz" -C "$work" $(cd "$work" && ls -d ./*.log ./*.csv ./*/neucodec_24khz.json 2>/dev/null)
tail -n 4 "$work"/*.log
ls -la "$out"
