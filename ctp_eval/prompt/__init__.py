"""The soft prompt: its file format (`format`), where it sits in front of text (`layout`), its initial values (`init`).

`from ctp_eval.prompt import SoftPrompt` keeps working: the public names are re-exported here.
"""

from ctp_eval.prompt.format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    PromptError,
    PromptMetadata,
    SoftPrompt,
    tokenizer_fingerprint,
)
from ctp_eval.prompt.init import init_from_vocab, init_prompt, most_frequent_tokens  # noqa: F401
from ctp_eval.prompt.layout import (  # noqa: F401
    LAYOUTS,
    check_layout,
    forward_with_prompt,
    layout_for,
    prefix_embeds,
    token_vectors,
    tokenizer_adds_bos,
)
