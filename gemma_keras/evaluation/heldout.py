"""A small held-out English text, the default of `gemma-keras export-tflite --check`.

Written for this package (no data set is downloaded): a few paragraphs of plain prose with
numbers, names and punctuation, about 400 tokens for Gemma's tokenizer.
"""

HELDOUT_TEXT = """\
The lighthouse at the end of the harbour was built in 1871, after two ships ran aground on \
the same rocks within a single winter. Its first keeper, a retired sailor named Thomas Hale, \
kept a logbook in which he wrote the weather, the ships that passed and the oil he burned \
each night. On calm evenings he walked down to the village to buy bread and to read the \
newspaper aloud to anyone who would listen.

A modern reader may find the logbook dull at first. Most entries say little more than "wind \
from the west, light rain, three boats out, all returned". But read across many years, the \
short lines tell a longer story: the herring arrived later each decade, the winters grew \
milder, and the number of boats fell from forty to nine.

To measure how well a model predicts text, we ask it to assign a probability to each word \
given the words before it. A model that has learned the patterns of a language spreads its \
probability over a few likely continuations; a model that has not must spread it thinly over \
thousands. Perplexity, the exponential of the average negative log-probability, counts how \
many equally likely choices the model is, in effect, choosing between at every step.

Quantization stores each weight of a network with fewer bits: eight, or even four, instead \
of thirty-two. The file becomes four to eight times smaller and, on most processors, faster \
to run, because moving weights from memory is what limits the speed of generating text one \
token at a time. The price is a small error in every weight. Whether that error matters is \
an empirical question, and the honest answer is to measure it: compare the quantized model \
with the original on the same text, token by token.

Recipe for a simple loaf: mix 500 grams of flour, 350 millilitres of warm water, 10 grams of \
salt and 7 grams of dried yeast. Knead for ten minutes, leave to rise for an hour, shape, \
leave for another forty minutes, then bake at 220 degrees for about thirty-five minutes, \
until the loaf sounds hollow when tapped underneath.
"""
