"""`lorafit ui`: the web page. A client of `train`, `data` and `infer`, never a second copy of them."""
