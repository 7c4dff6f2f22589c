set -e
D=../../../../shared/data/kaggle_3m
for k in 0 1; do
  date -u +"fold $k start %H:%M:%S"
  ../../../.venv/bin/python ../../train_variant.py --low-res-epochs 9 --low-res-size 128 -- --model pspnet-scratch \
    --data $D --split-file fold$k.json --epochs 14 --out fold$k > fold$k.log 2>&1
  date -u +"fold $k end %H:%M:%S"
done
