"""Looking inside a trained model: activations (trace), interventions, the logit lens, induction
scores, embedding neighbours, the contexts that fire a neuron, and plots of them. Everything here
sits above the core and reads params; nothing in the train path imports it."""


class InspectError(ValueError):
    pass
