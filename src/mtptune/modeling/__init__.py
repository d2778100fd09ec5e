"""The MTP head module and the attention pattern vLLM serves it with."""
