// The defaults of POST /v1/jobs as the API has them (app/schemas_jobs.py: MethodIn, HyperparametersIn; the
// LoRA targets from spafit_core.config). The objects stay plain JSON: a test compares them with the API's.

export const METHOD_DEFAULTS = {
  "name": "spafit", "n1": null, "n2": null, "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": null,
  "group3_bias": true
};

export const HYPERPARAMETER_DEFAULTS = {
  "epochs": 3, "batch_size": 16, "learning_rate": null, "head_learning_rate": null, "bias_learning_rate": null,
  "lora_learning_rate": null, "validation_fraction": 0.1, "max_seq_length": 128, "warmup_ratio": 0.06, "seed": 42,
  "early_stopping_patience": null, "weight_decay": 0.0, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
  "prefix_cache": false, "checkpoint_every_steps": null
};

export const LORA_TARGETS = {
  "all": ["query", "key", "value", "attention_output", "ffn_in", "ffn_out"],
  "default": ["query", "key", "value", "attention_output"]
};

// The method fields each method uses (the rest do not apply to it).
export const METHOD_FIELDS = {
  "spafit": ["n1", "n2", "rank", "alpha", "dropout", "targets", "group3_bias"],
  "lora": ["rank", "alpha", "dropout", "targets"],
  "bitfit": []
};
