#!/bin/bash
# CPU cost of one training epoch in the CIFAR-10-prefix study's setting (configs/studies/common_cifar10prefix.yaml),
# one torch thread: each method trains for 1 and for 2 epochs without the test evaluation, and bash's `time`
# gives user, system and wall seconds. Epoch 2 costs (2-epoch run) - (1-epoch run); it includes the per-epoch
# validation (PGD-5 on 500 images) and, for A-BSR-Net, AGENT's correction, which starts in epoch 2.
# Usage: benchmarks/epoch_cost.sh > epoch_cost.csv   (run from the repository root; runs go to /tmp/epoch_cost)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TIMEFORMAT="%U %S %R"
echo "method,epochs,user_seconds,system_seconds,wall_seconds"
for spec in "dense:sparsity.method=none" "bsrnet90:sparsity.method=bsrnet sparsity.density=0.1" \
            "rigl90:sparsity.method=rigl sparsity.density=0.1 sparsity.update_every=10" \
            "absr_paper90:sparsity.method=bsrnet sparsity.density=0.1 agent.enabled=true agent.gamma=0.1 agent.estimator=paper"; do
  name=${spec%%:*}; sets=""; for s in ${spec#*:}; do sets="$sets --set $s"; done
  for epochs in 1 2; do
    out=/tmp/epoch_cost/$name-$epochs; rm -rf "$out"
    t=$( { time .venv/bin/robust-sparse train configs/studies/common_cifar10prefix.yaml $sets --set optim.epochs=$epochs \
           --set eval.n_examples=0 --out "$out" --no-progress > /dev/null 2>&1; } 2>&1 )
    echo "$name,$epochs,${t// /,}"
  done
done
