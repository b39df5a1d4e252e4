"""v-prediction algebra shared by training and sampling: plain arithmetic on numpy or jax arrays."""

# --- v-prediction ------------------------------------------------------------------------------
# x_t = sqrt(a) x0 + sqrt(1-a) eps;  v = sqrt(a) eps - sqrt(1-a) x0  (a = alpha_bar at t).
# `alpha_bar` must broadcast against x (e.g. shape (B,1,1,1)).

def v_to_x0(x_t, v, alpha_bar):
    return alpha_bar ** 0.5 * x_t - (1 - alpha_bar) ** 0.5 * v


def v_to_eps(x_t, v, alpha_bar):
    return alpha_bar ** 0.5 * v + (1 - alpha_bar) ** 0.5 * x_t


def get_v(x0, eps, alpha_bar):
    return alpha_bar ** 0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


def q_sample(x0, eps, alpha_bar):
    return alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps
