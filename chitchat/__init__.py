"""chitchat: train GPT-2 chat models on multi-turn Chinese dialogue and chat with them."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import chitchat` (e.g. from preprocess.py) does not pull in torch.
    if name == "Chatbot":
        from .chat import Chatbot
        return Chatbot
    raise AttributeError(f"module 'chitchat' has no attribute {name!r}")
