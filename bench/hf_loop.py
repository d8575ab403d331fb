"""The Hugging Face perplexity loop as users copy it (what `sliding-seed` reproduces), as a
program: python bench/hf_loop.py MODEL_DIR TEXT_FILE [max_length stride threads]."""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_file = sys.argv[1:3]
max_length, stride, threads = (int(x) for x in (sys.argv[3:6] or (2048, 512, 2)))
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
with open(text_file, encoding="utf-8") as f:
    encodings = tokenizer(f.read(), return_tensors="pt")

nlls = []
for i in range(0, encodings.input_ids.size(1), stride):
    begin_loc = max(i + stride - max_length, 0)
    end_loc = min(i + stride, encodings.input_ids.size(1))
    input_ids = encodings.input_ids[:, begin_loc:end_loc].to(model.device)
    target_ids = input_ids.clone()
    target_ids[:, :-stride] = -100
    with torch.no_grad():
        outputs = model(input_ids, labels=target_ids)
        nlls.append(outputs.loss)
ppl = torch.exp(torch.stack(nlls).mean())
print(f"ppl {ppl.item():.6f}")
