"""Training by distillation: data (didbq.train.data), and the loop that uses it."""
