__version__ = "0.1.0"

from uio.config import ModelConfig  # noqa: E402
from uio.vocab import Vocab  # noqa: E402
from uio.model import Model, ModelOutput  # noqa: E402
from uio.modeling.generation import GenerationOutput  # noqa: E402

from uio.image_tokenizer import VQGAN, ImageTokenizer  # noqa: E402
from uio import tasks  # noqa: E402
from uio.tasks import get_task  # noqa: E402
